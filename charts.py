"""
Line charts as small SVG files, with no plotting library: evaluate.py's win rate against alpha and
miniature.py's curves. Imports nothing of ours, so it can be copied alone.

    write_atomic("alpha.svg", svg_chart({"cpo": [(0, 0.4), (0.5, 0.55), (1, 0.5)]}, "alpha", "win rate"))
"""
from xml.sax.saxutils import escape

W, H = 640, 400                                  # the picture, pixels
LEFT, RIGHT, TOP, BOTTOM = 60, 190, 30, 50      # margins around the plot; the legend sits in the right one
COLOURS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"]


def svg_chart(curves, xlabel, ylabel, title=""):
    """curves: {label: [(x, y) or (x, y, err)]} -> the SVG text of a line chart: each curve a polyline with
    dots (and error bars of +-err), sorted by x, with ticked axes and a legend."""
    pts = [p for ps in curves.values() for p in ps]
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = min(p[1] - err(p) for p in pts), max(p[1] + err(p) for p in pts)
    x1 = x1 if x1 > x0 else x0 + 1  # all equal: a unit range, not an empty one
    y1 = y1 if y1 > y0 else y0 + 1

    def sx(x):
        return LEFT + (x - x0) / (x1 - x0) * (W - LEFT - RIGHT)

    def sy(y):
        return H - BOTTOM - (y - y0) / (y1 - y0) * (H - TOP - BOTTOM)

    out = axes(xlabel, ylabel, title)
    for i in range(5):  # ticks
        x, y = x0 + i / 4 * (x1 - x0), y0 + i / 4 * (y1 - y0)
        out.append(f'<text x="{sx(x):.1f}" y="{H - BOTTOM + 16}" text-anchor="middle">{x:.3g}</text>')
        out.append(f'<text x="{LEFT - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.3g}</text>')
    for n, (label, ps) in enumerate(sorted(curves.items())):
        out += curve(sorted(ps), COLOURS[n % len(COLOURS)], sx, sy)
        out += legend_entry(n, label, COLOURS[n % len(COLOURS)])
    return "\n".join(out + ["</svg>"]) + "\n"


def err(p):
    """A point's error bar half-width: its third number, 0 when it has none."""
    return p[2] if len(p) > 2 else 0


def axes(xlabel, ylabel, title):
    """The opening lines: the canvas, the title, the two axis lines and their labels."""
    mid_x, mid_y = (LEFT + W - RIGHT) / 2, (TOP + H - BOTTOM) / 2
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" '
        f'font-size="12">',
        f'<rect width="{W}" height="{H}" fill="white"/>',
        f'<text x="{W / 2}" y="18" text-anchor="middle">{escape(title)}</text>',
        f'<polyline points="{LEFT},{TOP} {LEFT},{H - BOTTOM} {W - RIGHT},{H - BOTTOM}" fill="none" '
        f'stroke="black"/>',
        f'<text x="{mid_x}" y="{H - 10}" text-anchor="middle">{escape(xlabel)}</text>',
        f'<text transform="translate(14,{mid_y}) rotate(-90)" text-anchor="middle">{escape(ylabel)}</text>',
    ]


def curve(ps, colour, sx, sy):
    """One curve's lines: the polyline through its points, a dot at each and its error bars."""
    points = " ".join(f"{sx(p[0]):.1f},{sy(p[1]):.1f}" for p in ps)
    out = [f'<polyline points="{points}" fill="none" stroke="{colour}"/>']
    for p in ps:
        out.append(f'<circle cx="{sx(p[0]):.1f}" cy="{sy(p[1]):.1f}" r="3" fill="{colour}"/>')
        if err(p):
            out.append(f'<line x1="{sx(p[0]):.1f}" x2="{sx(p[0]):.1f}" y1="{sy(p[1] - err(p)):.1f}" '
                       f'y2="{sy(p[1] + err(p)):.1f}" stroke="{colour}"/>')
    return out


def legend_entry(n, label, colour):
    """The n-th legend line, right of the plot: a short stroke in the curve's colour and its label."""
    y = TOP + 10 + 18 * n
    return [f'<line x1="{W - RIGHT + 10}" x2="{W - RIGHT + 30}" y1="{y}" y2="{y}" stroke="{colour}" '
            f'stroke-width="2"/>',
            f'<text x="{W - RIGHT + 35}" y="{y + 4}">{escape(label)}</text>']

# A preset of one run with train.py's defaults (no stages): the tests set everything with flags.
config = dict()

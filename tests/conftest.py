import os
import sys

# Tests import the top-level files (model.py, cpo.py, ...) directly, as users do.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import os
import runpy
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)  # fuzz targets import the shared strategies module
runpy.run_path(os.path.join(HERE, "..", "tests", "conftest.py"))  # the hypothesis profiles, kept in one place

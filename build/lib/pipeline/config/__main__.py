"""python -m pipeline.config --markdown > docs/configuration.md"""
import sys

from pipeline.config.docs import markdown

if sys.argv[1:] != ["--markdown"]:
    sys.exit("usage: python -m pipeline.config --markdown")
print(markdown(), end="")

"""megamoe's build entry point. The metadata (name, version, dependencies, extras) is in pyproject.toml; this file
stays for tools and habits that call `setup.py` and for editable installs by older pip releases."""

from setuptools import setup

setup()

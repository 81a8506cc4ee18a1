"""Packaging entry point: the metadata, dependencies and man pages are declared in setup.cfg."""

from setuptools import setup

setup()

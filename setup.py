"""Builds fused_ls; the native extension fused_ls._C is added by csrc/ (see README)."""

from setuptools import setup

setup()

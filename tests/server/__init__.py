"""Tests of realm.server (a package: its module names must not clash with other test dirs)."""

"""Bundled galaxy population catalogs (installed as ``galgen.catalogs``).

See ``catalogs/README.md`` for the schema and provenance, and
``catalogs/make_populations.py`` for the script that generates them.
"""

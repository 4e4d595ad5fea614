"""The release, recorded in every manifest a build writes (its own module, so the build does not
import the package it is part of)."""

__version__ = "0.1.0"

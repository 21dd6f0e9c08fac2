"""Tools that build test models (tiny random-weight fixtures, single-file export); never used to serve."""

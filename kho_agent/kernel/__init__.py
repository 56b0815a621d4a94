"""The seams: one thin module per kernel interface. Every path hangs off a root tests can move."""

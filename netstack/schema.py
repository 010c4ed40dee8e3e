"""The state files' schema number: it changes whenever the shape of a class in
netstack/model.py does (model re-exports it). A module of its own so that commands that
read only the intent log (`down`) need not import the model's ~50 dataclasses (~13 ms,
docs/field-notes.md "Python start-up")."""

SCHEMA = 4

"""The entry's own files, shipped as package data: model.py is copied into every exported
folder as it is (its settings come from the predictor.json written beside it); Dockerfile,
Dockerfile.build-ext, README.md and the readme-*.md parts are string.Template texts that
m2dino.export.render fills in."""

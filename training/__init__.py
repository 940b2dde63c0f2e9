"""Offline training: data, recipes, base training, targets, OCD training, evaluation, bundles."""

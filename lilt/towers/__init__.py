"""Backbone towers: a uniform interface over timm vision models and transformers text encoders."""

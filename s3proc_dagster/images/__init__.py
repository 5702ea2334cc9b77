"""Seed 002's image requests: parse the product CSV, fetch, compress, upload."""

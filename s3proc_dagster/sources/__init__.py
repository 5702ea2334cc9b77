"""Where files come from: the watched directory (and, later, an S3 incoming prefix)."""

"""S3 transfer: streaming upload with resumable multipart, verification, manifests, recovery."""

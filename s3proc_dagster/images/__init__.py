"""Image requests (the specification's Requests and RequestData): parse the product CSV, fetch, compress, upload."""

"""Authentication: credentials in headers -> Principal."""

"""Authorisation: canonical paths, the route table, model allow-lists. Pure, no sockets."""

"""Credentials: the bcrypt users file, tokens and the password-check pool (:mod:`~broker.auth.users`)."""

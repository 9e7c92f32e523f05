"""Completion webhooks: a prompt's (or its tenant's) receiver is told when its job starts and ends.

`subscription`: what a prompt asks for at admission, checked there, and the deliveries its events make;
`signing`: Standard Webhooks' signature; `sender`: the delivery worker over the outbox in the state store
(`Store.webhooks_*`). Nothing is imported here: the event router imports `subscription` alone.
"""

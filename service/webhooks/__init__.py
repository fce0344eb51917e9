"""Signed webhook deliveries (Standard Webhooks): events about forget requests, POSTed to one endpoint.

config.py      the endpoint, its secret and the retry schedule, carried by the engine
signing.py     the three headers that sign a body
outbox.py      `emit`: a delivery row in the caller's transaction, when an endpoint is configured
events.py      the data of the events the service itself sends
delivery.py    claiming due deliveries, POSTing them, recording each attempt; an admin's retry
hooks.py       what a delivered event sets off (the data owner's acknowledgement of an erasure)
queries.py     reads for the API

docs/webhooks.md describes the events, the envelope, the headers and the retry schedule.
"""

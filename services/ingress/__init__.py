"""The AMQP ingress: ``umi.ingress`` takes JSON task envelopes from any AMQP client (``docs/ingress.md``)."""

"""Stored responses: what the Responses API's ``store`` keeps, and the conversations that
``previous_response_id`` continues.

``items.py`` shapes a turn's items (ids, the history a next turn is sent), ``store.py`` keeps turns in
SQL (encrypted, per account, with an expiry), ``capture.py`` picks the finished response object out of
a whole answer or a stream, and ``service.py`` is what the pipeline and the HTTP routes call."""

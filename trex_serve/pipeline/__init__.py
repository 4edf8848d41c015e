"""The request path of every generation route, in the order a request meets it:

1. ``request_path.py`` — the ``Pipeline``: parse and validate, authenticate, resolve the model,
   order the targets and find their provider keys, admit, then the attempts with fallback.
2. ``stateful.py`` — the Responses API's stored responses and the response cache, around the attempts.
3. ``settle_and_answer.py`` — the ``Call`` state and the ``Answer``: the whole or translated body,
   the relayed stream settled when it ends, the errors, settlement and the request's record.
4. ``token_count.py`` — Anthropic's ``count_tokens``, which admits and records like the others.
5. ``stored_responses.py`` — ``GET``/``DELETE /v1/responses/{id}``: reading back what step 2 kept.
"""

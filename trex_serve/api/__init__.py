"""The OpenAI wire: request and answer shapes, role-by-role message checks, and the Responses API
mapped to chat completions and back."""

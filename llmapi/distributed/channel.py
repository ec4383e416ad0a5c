"""The channel between the user's process and rank 0: multiprocessing.connection with a per-session key.

Both ends prove they hold the key (HMAC challenge and answer) before any message is unpickled, so a
process that merely reaches the port cannot make either side unpickle anything.
"""

from __future__ import annotations

import os
import secrets
from collections import namedtuple
from multiprocessing.connection import Client, Connection, Listener

ADDRESS_ENV = "LLMAPI_SESSION_ADDRESS"
KEY_ENV = "LLMAPI_SESSION_KEY"

# A _core.Response's fields as plain values: what rank 0 sends for a request it refuses (error_response); a step's
# responses cross as _core.encode_responses' bytes.
RemoteResponse = namedtuple("RemoteResponse", [
    "request_id", "seq_index", "token_ids", "finished", "request_finished", "finish_reason", "stop_reason",
    "error", "num_prompt_tokens", "num_cached_tokens", "num_top_logprobs", "logprobs", "ranks", "top_ids",
    "top_logprobs", "cumulative_logprob", "num_draft_tokens", "num_accepted_draft_tokens"])

REQUEST_FIELDS = ("request_id", "prompt_token_ids", "max_tokens", "min_tokens", "eos_token_ids", "stop_token_ids",
                  "ignore_eos", "temperature", "top_k", "top_p", "seed", "min_p", "repetition_penalty",
                  "presence_penalty", "frequency_penalty", "bad_words", "logit_bias", "num_sequences", "beam_search",
                  "length_penalty", "early_stopping", "num_returned", "prompt_logprobs", "context_logits",
                  "generation_logits", "token_history", "adapter_slot", "cache_salt", "prompt_table_size",
                  "encoder_token_ids", "no_repeat_ngram_size", "forced_eos_token_id", "forced_bos_token_id")
"""The _core.Request constructor's arguments, as the user's process sends them (`logprobs` is read as
`requested_logprobs`)."""


def listen() -> tuple[Listener, dict]:
    """A listener on the loopback interface with a fresh key, and the environment that lets rank 0 connect."""
    key = secrets.token_bytes(32)
    listener = Listener(("127.0.0.1", 0), family="AF_INET", authkey=key)
    host, port = listener.address
    return listener, {ADDRESS_ENV: f"{host}:{port}", KEY_ENV: key.hex()}


def connect_from_env() -> Connection:
    """Rank 0: connect to the user's process named by the environment the spawner set."""
    host, port = os.environ[ADDRESS_ENV].rsplit(":", 1)
    key = bytes.fromhex(os.environ.pop(KEY_ENV))  # not inherited by anything this rank starts
    return Client((host, int(port)), family="AF_INET", authkey=key)


def error_response(fields: dict, error: str) -> RemoteResponse:
    """The response that ends a request (its request_fields) with finish_reason "error" before any step."""
    return RemoteResponse(
        request_id=fields["request_id"], seq_index=0, token_ids=[], finished=True, request_finished=True,
        finish_reason="error", stop_reason=-1, error=error, num_prompt_tokens=len(fields["prompt_token_ids"]),
        num_cached_tokens=0, num_top_logprobs=-1, logprobs=[], ranks=[], top_ids=[], top_logprobs=[],
        cumulative_logprob=0.0, num_draft_tokens=0, num_accepted_draft_tokens=0)


def request_fields(request) -> dict:
    """A _core.Request's constructor arguments."""
    fields = {name: getattr(request, name) for name in REQUEST_FIELDS}
    for name in ("prompt_token_ids", "eos_token_ids", "stop_token_ids", "encoder_token_ids"):
        fields[name] = list(fields[name])
    fields["bad_words"] = [list(w) for w in fields["bad_words"]]
    fields["logit_bias"] = dict(fields["logit_bias"])
    fields["logprobs"] = request.requested_logprobs
    return fields

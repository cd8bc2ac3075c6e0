"""Keep secrets out of everything curate writes or prints.

One module decides what a secret looks like; the engine calls it where recipes, URLs and
messages leave the process: the manifest (resolved recipe, source description), the URLs of
samples and drop rows (once, when the input is split), the drop log, and the command line's
messages. What is masked, always with ``***``:

- **URL user information**: ``https://user:PASSWORD@host/`` keeps the user name and masks the
  password; a user name alone (``https://TOKEN@host/``, the way some hosts take tokens) is masked
  whole. The host and path stay, so a masked URL still says where it points. urllib3 never sends
  user information anyway, so masking it changes nothing that curate fetches.
- In text (messages, manifest values, drop details), besides URLs: query parameters named like
  credentials (``token``, ``key``, ``sig``, ``X-Amz-Signature``, ...), ``Authorization:`` header
  values and ``Bearer`` tokens, strings shaped like well-known tokens (Hugging Face ``hf_...``, AWS
  access key ids, GitHub, OpenAI and Slack tokens), and the values of environment variables named
  like credentials (``HF_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_SESSION_TOKEN``, any name holding
  TOKEN, SECRET, PASSWORD, PASSWD, CREDENTIAL, API_KEY, ACCESS_KEY or PRIVATE_KEY).
- In a mapping (a resolved recipe): the string value of every key named like a credential
  (``token``, ``hf_token``, ``password``, ``secret``, ``api_key``, ``access_key``,
  ``authorization``, ...). Keys that merely end in ``_key`` (``url_key``, ``license_key``) or the
  robots.txt product token ``user_agent_token`` are not credentials and stay.

Sample data other than URLs (captions, `meta`) is the dataset itself and is not rewritten.
"""

from __future__ import annotations

import os
import re
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

MASK = "***"
MIN_SECRET_CHARS = 8  # shorter environment values ("1", "true") are not worth masking and would mask everything

_URL = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.\-]*://)(?P<authority>[^/?#\s\"'<>]*)")
_HAS_USERINFO = r"^\s*[A-Za-z][A-Za-z0-9+.\-]*://[^/?#\s]*@"  # for pyarrow's regex match (RE2)
_QUERY_SECRET = re.compile(
    r"(?i)([?&;](?:access_token|auth|auth_token|api_key|apikey|client_secret|key|password|passwd|secret|sig|"
    r"signature|token|x-amz-credential|x-amz-security-token|x-amz-signature|x-goog-credential|x-goog-signature)=)"
    r"[^&#\s\"'<>]+")
_AUTHORIZATION = re.compile(r"(?i)(\b(?:proxy-)?authorization\b[\"']?\s*[:=]\s*[\"']?)(?:(?:basic|bearer|token)\s+)?"
                            r"[^\s\"',}]+")
_BEARER = re.compile(r"(?i)(\bbearer\s+)[A-Za-z0-9._~+/=\-]{8,}")
_TOKEN_SHAPES = re.compile(
    r"\b(?:hf_[A-Za-z0-9]{20,}|(?:AKIA|ASIA)[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{40,}"
    r"|sk-[A-Za-z0-9_\-]{20,}|xox[abprs]-[A-Za-z0-9\-]{10,})\b")
_SECRET_ENV_NAME = re.compile(r"TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL|API_?KEY|ACCESS_?KEY|PRIVATE_?KEY")
_SECRET_KEY_WORDS = ("token", "secret", "password", "passwd", "credential", "credentials", "authorization",
                     "api_key", "apikey", "access_key", "secret_key", "private_key", "access_key_id")
_NOT_SECRET_KEYS = frozenset({"user_agent_token"})  # robots.txt product token, a public name


def secret_key_name(name: object) -> bool:
    """True when a mapping key names a credential (``hf_token``, ``password``, ``api_key``, ...)."""
    if not isinstance(name, str):
        return False
    key = name.strip().lower().replace("-", "_")
    if key in _NOT_SECRET_KEYS:
        return False
    return any(key == word or key.endswith("_" + word) for word in _SECRET_KEY_WORDS)


def environment_secrets() -> list[str]:
    """Values of environment variables named like credentials, longest first (so overlaps mask whole)."""
    values = {value for name, value in os.environ.items()
              if _SECRET_ENV_NAME.search(name.upper()) and len(value.strip()) >= MIN_SECRET_CHARS}
    return sorted(values, key=len, reverse=True)


def _mask_userinfo(match: re.Match) -> str:
    authority = match["authority"]
    userinfo, at, host = authority.rpartition("@")
    if not at or not userinfo:
        return match[0]
    user, colon, password = userinfo.partition(":")
    masked = f"{user}:{MASK}" if colon and user else MASK
    return f"{match['scheme']}{masked}@{host}"


def redact_url(url: str | None) -> str | None:
    """`url` with the password (or a lone user name) of its user information masked; else unchanged."""
    if not url or "@" not in url:
        return url
    return _URL.sub(_mask_userinfo, url, count=1)


def redact_text(text: str | None, env_secrets: list[str] | None = None) -> str | None:
    """`text` with every secret described in the module docstring masked.

    `env_secrets` (from `environment_secrets()`) saves reading the environment again when many texts are masked.
    """
    if not text:
        return text
    if "@" in text:
        text = _URL.sub(_mask_userinfo, text)
    if "=" in text:
        text = _QUERY_SECRET.sub(lambda m: m[1] + MASK, text)
    text = _AUTHORIZATION.sub(lambda m: m[1] + MASK, text)
    text = _BEARER.sub(lambda m: m[1] + MASK, text)
    text = _TOKEN_SHAPES.sub(MASK, text)
    for value in environment_secrets() if env_secrets is None else env_secrets:
        if value in text:
            text = text.replace(value, MASK)
    return text


def redact_data(value: Any, env_secrets: list[str] | None = None) -> Any:
    """A copy of JSON-like `value` (dicts, lists, strings) with secrets masked, by key name and in text."""
    env = environment_secrets() if env_secrets is None else env_secrets
    if isinstance(value, dict):
        return {key: (MASK if secret_key_name(key) and isinstance(item, str) and item else redact_data(item, env))
                for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_data(item, env) for item in value]
    if isinstance(value, str):
        return redact_text(value, env)
    return value


# ---------------------------------------------------------------------------- tables


def _any_userinfo(values: pa.Array | pa.ChunkedArray) -> bool:
    if len(values) == 0:
        return False
    found = pc.match_substring_regex(values, _HAS_USERINFO)
    return bool(pc.any(found).as_py())


def _replace(table: pa.Table, name: str, values: list[Any]) -> pa.Table:
    index = table.schema.get_field_index(name)
    return table.set_column(index, table.schema.field(index), pa.array(values, type=table.schema.field(index).type))


def redact_sample_urls(table: pa.Table) -> pa.Table:
    """A SAMPLE_SCHEMA table with user information masked in `image_meta[].url` and `source.url`.

    Tables without such URLs (nearly all) are returned as they are, after one vectorised check per column.
    """
    names = table.schema.names
    if "image_meta" in names:
        column = table.column("image_meta")
        urls = pc.struct_field(pc.list_flatten(column), "url")
        if _any_userinfo(urls):
            metas = column.to_pylist()
            for images in metas:
                for meta in images or []:
                    if meta is not None:
                        meta["url"] = redact_url(meta.get("url"))
            table = _replace(table, "image_meta", metas)
    if "source" in names:
        column = table.column("source")
        if _any_userinfo(pc.struct_field(column, "url")):
            sources = column.to_pylist()
            for source in sources:
                if source is not None:
                    source["url"] = redact_url(source.get("url"))
            table = _replace(table, "source", sources)
    return table


def redact_drop_table(table: pa.Table) -> pa.Table:
    """A DROP_SCHEMA table with secrets masked in `url` (user information) and `detail` (any secret)."""
    if table.num_rows == 0:
        return table
    if "url" in table.schema.names and _any_userinfo(table.column("url")):
        table = _replace(table, "url", [redact_url(url) for url in table.column("url").to_pylist()])
    if "detail" in table.schema.names:
        # Details repeat a lot (one host's failure is the detail of all its rows): mask each distinct text once.
        details = table.column("detail")
        distinct = pc.unique(details)
        texts = distinct.to_pylist()
        env = environment_secrets()
        redacted = [redact_text(text, env) for text in texts]
        if redacted != texts:
            positions = pc.index_in(details, value_set=distinct, skip_nulls=False)
            field = table.schema.field("detail")
            table = table.set_column(table.schema.get_field_index("detail"), field,
                                     pa.array(redacted, type=field.type).take(positions))
    return table

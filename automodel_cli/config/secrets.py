"""Which settings hold credentials: one rule for printing, saving, logging and launching.

A key or variable name marks a credential when one of its words (parts between ``_``, ``.``
and ``-``) is ``token``, ``api_key``, ``password``, ``secret``, ``credentials``, ``access_key``
or ``private_key``: ``HF_TOKEN``, ``logging.wandb.api_key`` and ``DB_PASSWORD`` do;
``model.tokenizer`` and ``TOKENIZERS_PARALLELISM`` do not. Values of such keys are written as
``<redacted>`` wherever a config is printed or saved, and never sent to a metrics service.
"""

from __future__ import annotations

import re

REDACTED = "<redacted>"

#: Names of variables and keys that carry credentials; whole word parts only.
SECRET_NAME = re.compile(
    r"(^|[_.-])(TOKEN|AUTH_?TOKEN|API_?KEY|PASSWORD|PASSWD|SECRET|SECRET_?KEY|CREDENTIALS?|ACCESS_?KEY"
    r"|PRIVATE_?KEY)([_.-]|$)", re.IGNORECASE)


def is_secret_name(name: str) -> bool:
    """Whether a key (dotted or not) or an environment variable name marks a credential."""
    return SECRET_NAME.search(str(name)) is not None

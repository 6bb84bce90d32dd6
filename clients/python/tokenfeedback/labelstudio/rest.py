"""The calls the backend makes to Label Studio's REST API: read a task, write its data.

The backend writes into a task's data twice: a completion it generated for a prompt-only task, and
ERROR_KEY, the reason it could not store an annotation of that task for training (Label Studio saves
the annotation whatever the webhook answers; the shipped labeling config shows this field above the
completion, so the annotator sees it where they label). Authorization is Label Studio's
`Token <key>` header; the address and key come from /setup or the command line.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field

# Task data field holding why annotations of the task were not stored ("" once none are).
ERROR_KEY = "tokenfeedback_error"


class LabelStudioError(Exception):
    """A Label Studio API call failed: what was called, and why."""


@dataclass(frozen=True)
class LabelStudioApi:
    url: str  # Label Studio's address, e.g. http://127.0.0.1:8080
    token: str = field(repr=False)  # its API key
    timeout: float = 10.0  # seconds per call

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.url.rstrip('/')}{path}", method=method,
            data=None if body is None else json.dumps(body, ensure_ascii=False).encode(),
            headers={"Content-Type": "application/json", "Authorization": f"Token {self.token}"},
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                raw = reply.read()
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise LabelStudioError(f"{method} {self.url}{path}: HTTP {exc.code}: {detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise LabelStudioError(f"{method} {self.url}{path}: {exc}") from None
        try:
            return json.loads(raw or b"{}")
        except json.JSONDecodeError:
            raise LabelStudioError(f"{method} {self.url}{path}: the answer is not JSON: {raw[:200]!r}") from None

    def task(self, task_id: object) -> dict:
        return self._call("GET", f"/api/tasks/{task_id}")

    def write_task_data(self, task_id: object, data: dict) -> None:
        """Replaces the task's data (Label Studio's PATCH replaces `data` whole: pass all of it)."""
        self._call("PATCH", f"/api/tasks/{task_id}", {"data": data})

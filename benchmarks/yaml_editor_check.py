"""What an editor sees: drives a real YAML language server (the one behind VS Code's YAML extension,
yamlls in Neovim) over LSP on a suite file that names the published schema, and prints the
completions it offers and the problems it reports.

    npm install yaml-language-server          # Node.js; not a dependency of this project
    python benchmarks/yaml_editor_check.py --server node_modules/.bin/yaml-language-server
"""

from __future__ import annotations

import argparse
import json
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from evals.schemas import schema_text

SUITE = """\
# yaml-language-server: $schema=suite.schema.json
name: editor-check
generation:
  height: 64
  stpes: 8
  <key>
cases:
  - {id: a, prompt: "a red cube", seeds: [0]}
metrics: [psnr]
gates:
  - {metric: pnsr, stat: mean, op: ">=", value: 30}
  - metric: <value>
""".replace("<key>", "").replace("<value>", "")  # where the cursor asks for completions
KEY_LINE = 5  # the empty line inside `generation:` (0-based): keys are completed here
VALUE_LINE = 11  # `  - metric: `: metric names are completed here


class Server:
    """A language server on stdio: JSON-RPC requests, and the notifications it sends."""

    def __init__(self, command: list[str], root: Path):
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.messages: queue.Queue[dict[str, Any]] = queue.Queue()
        self.next_id = 0
        threading.Thread(target=self._read, daemon=True).start()
        self.request("initialize", {"processId": None, "rootUri": root.as_uri(), "capabilities": {}})
        self.notify("initialized", {})
        settings = {"yaml": {"validate": True, "completion": True, "hover": True, "schemaStore": {"enable": False}}}
        self.notify("workspace/didChangeConfiguration", {"settings": settings})

    def _read(self) -> None:
        stream = self.process.stdout
        assert stream is not None
        while True:
            length = 0
            while (line := stream.readline().decode()) not in ("\r\n", ""):
                if line.lower().startswith("content-length:"):
                    length = int(line.split(":")[1])
            if not length:
                return
            self.messages.put(json.loads(stream.read(length)))

    def _send(self, message: dict[str, Any]) -> None:
        body = json.dumps({"jsonrpc": "2.0", **message}).encode()
        assert self.process.stdin is not None
        self.process.stdin.write(f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        self.process.stdin.flush()

    def notify(self, method: str, params: dict[str, Any]) -> None:
        self._send({"method": method, "params": params})

    def request(self, method: str, params: dict[str, Any]) -> Any:
        self.next_id += 1
        self._send({"id": self.next_id, "method": method, "params": params})
        while True:
            message = self.wait_for(lambda m: True)
            if message.get("id") == self.next_id and "method" not in message:
                return message.get("result")

    def wait_for(self, wanted: Any, timeout: float = 30) -> dict[str, Any]:
        """The next message `wanted` accepts; the server's own requests are answered on the way."""
        while True:
            message = self.messages.get(timeout=timeout)
            if "method" in message and "id" in message:  # e.g. workspace/configuration
                items = message.get("params", {}).get("items", [])
                self._send({"id": message["id"], "result": [None] * len(items) if items else None})
                continue
            if wanted(message):
                return message

    def close(self) -> None:
        self.process.kill()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", default=shutil.which("yaml-language-server"), help="yaml-language-server")
    args = parser.parse_args()
    if not args.server:
        parser.error("yaml-language-server not found: `npm install yaml-language-server`, then --server PATH")
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "suite.schema.json").write_text(schema_text("suite"))  # as `evals schema suite --out` writes it
        suite = root / "editor-check.yaml"
        suite.write_text(SUITE)
        server = Server([args.server, "--stdio"], root)
        try:
            uri = suite.as_uri()
            document = {"uri": uri, "languageId": "yaml", "version": 1, "text": SUITE}
            server.notify("textDocument/didOpen", {"textDocument": document})
            found = server.wait_for(
                lambda m: (
                    m.get("method") == "textDocument/publishDiagnostics"
                    and m["params"]["uri"] == uri
                    and m["params"]["diagnostics"]
                )
            )
            print("problems the editor underlines:")
            for d in found["params"]["diagnostics"]:
                print(f"  line {d['range']['start']['line'] + 1}: {d['message']}")
            for what, line, column in (("keys", KEY_LINE, 2), ("metric names", VALUE_LINE, 12)):
                position = {"line": line, "character": column}
                result = server.request("textDocument/completion", {"textDocument": {"uri": uri}, "position": position})
                items = result["items"] if isinstance(result, dict) else result or []
                print(f"{what} completed on line {line + 1}: {', '.join(sorted(i['label'] for i in items))}")
        finally:
            server.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""The apps end to end with the default model (SmolLM2-135M-Instruct): ``swarm-peer
demo --web`` starts real ``swarm-peer serve`` processes, answers its question, then keeps
the swarm and the page up until Ctrl-C; an ``openai`` client and ``curl`` talk to it."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import openai
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_demo_web_serves_the_page_and_the_api_until_ctrl_c():
    proc = subprocess.Popen([sys.executable, "-m", "peer.cli", "demo", "--web", "--web-port", "0", "--peers", "2",
                             "--max-new-tokens", "8"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines: queue.Queue[str] = queue.Queue()
    out: list[str] = []

    def pump():
        for line in proc.stdout:
            out.append(line)
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        while True:
            line = lines.get(timeout=600)
            if line.startswith("The swarm stays up. Open "):
                url = line.split("Open ", 1)[1].split(" ", 1)[0]
                break
        assert any(line.startswith("route: ") for line in out)
        client = openai.OpenAI(base_url=url + "v1", api_key="unused", max_retries=0, timeout=300)
        answer = client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=16,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}])
        assert "Paris" in answer.choices[0].message.content
        assert [tuple(h["blocks"]) for h in answer.model_extra["swarm"]["route"]] == [(0, 15), (15, 30)]
        streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
            model="smollm2-135m-instruct", temperature=0, max_tokens=16, stream=True,
            messages=[{"role": "user", "content": "What is the capital of France? Answer in one word."}]))
        assert streamed == answer.choices[0].message.content
        if shutil.which("curl"):
            page = subprocess.run(["curl", "-sS", "--max-time", "60", url], capture_output=True, text=True)
            assert "<title>swarm-peer</title>" in page.stdout
            view = json.loads(subprocess.run(["curl", "-sS", "--max-time", "60", url + "api/swarm"],
                                             capture_output=True, text=True).stdout)
            assert len(view["servers"]) == 2
            assert view["gaps"] == []
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(120) == 0, proc.stderr.read()[-3000:]
        assert any("servers exited with codes [0, 0]" in line for line in out)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

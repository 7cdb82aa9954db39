"""URLs end in a clear error naming them, whatever the server does (one that
never answers: at --url-timeout); two runs never write the same output file
at once."""

from __future__ import annotations

import dataclasses
import fcntl
import http.server
import io
import threading

import pytest
import soundfile
from helpers import HeldAudioServer, local_http_server, tone

import run_qwen2_audio as tool

WAV = io.BytesIO()
soundfile.write(WAV, tone(1, 16000), 16000, format="WAV")
WAV = WAV.getvalue()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (http.server's name)
        routes = {
            "/ok.wav": (200, "audio/wav", WAV),
            "/404": (404, "text/plain", b"no"),
            "/500": (500, "text/plain", b"boom"),
            "/page.wav": (200, "text/html", b"<html>hi</html>"),
            "/big.wav": (200, "audio/wav", WAV * 8),
        }
        if self.path == "/loop":
            self.send_response(302)
            self.send_header("Location", "/loop")
            self.end_headers()
            return
        status, kind, body = routes.get(self.path, (200, "audio/wav", WAV))
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except BrokenPipeError:  # the client gave up first, as it should
            pass

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def server():
    with local_http_server(Handler) as url:
        yield url


# A timeout no local answer comes near, even on a busy machine: a test that
# needs --url-timeout to end the download sets a short one (TIMES_OUT).
OPTIONS = tool.Options(system_prompt="", url_timeout=60.0, max_audio_bytes=len(WAV) * 4)
TIMES_OUT = dataclasses.replace(OPTIONS, url_timeout=1.0)


def test_a_good_url_decodes(server):
    clip = tool.load_clip(f"{server}/ok.wav", OPTIONS)
    assert clip.seconds == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize(
    ("path", "message"),
    [
        ("/404", "HTTP 404"),
        ("/500", "HTTP 500"),
        ("/loop", "HTTP 302"),
        ("/page.wav", "server sent text/html, not audio"),
        ("/big.wav", "over --max-audio-mb"),
    ],
)
def test_bad_urls_fail_clearly_naming_the_url(server, path, message):
    with pytest.raises(tool.ExplainedError) as caught:
        tool.load_clip(f"{server}{path}", OPTIONS)
    assert str(caught.value).startswith(f"audio {server}{path}: ")
    assert message in str(caught.value)


def test_a_url_that_never_answers_fails_at_the_url_timeout_naming_both():
    """The server holds its answer until released, so only --url-timeout can
    end the download, and the error (a batch's error record for the request)
    names the URL and the timeout. The release after 300 s is a backstop, not
    a bound: without a timeout the download would get the audio then and the
    test fail instead of hanging."""
    with HeldAudioServer() as held:
        backstop = threading.Timer(300, held.release)
        backstop.start()
        try:
            with pytest.raises(tool.ExplainedError) as caught:
                tool.load_clip(held.url, TIMES_OUT)
            assert not held.released.is_set(), "the audio was sent: no timeout ended the wait"
        finally:
            backstop.cancel()
    assert str(caught.value) == (
        f"audio {held.url}: download failed (no complete answer within --url-timeout 1 s)"
    )


def test_a_second_run_on_the_same_output_refuses(tiny_model, clips, tmp_path, capsys):
    manifest = tmp_path / "jobs.jsonl"
    manifest.write_text(f'{{"id": "a", "audio": "{clips["a.wav"]}"}}\n')
    out = tmp_path / "results.jsonl"
    out.write_text('{"id": "earlier", "answer": "kept"}\n')
    with out.open("a") as first_run:
        fcntl.flock(first_run.fileno(), fcntl.LOCK_EX)
        argv = ["--model", str(tiny_model), "--manifest", str(manifest), "--output", str(out)]
        assert tool.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: --output {out}: another run is writing to it; " + (
        "wait for it or choose another file"
    )
    assert out.read_text() == '{"id": "earlier", "answer": "kept"}\n'  # untouched

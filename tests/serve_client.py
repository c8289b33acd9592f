"""Checks `pipit serve` through the real `openai` client (raw requests with the standard library).

Run by tests/serve.rs: `python serve_client.py CASE URL EXPECTED.json`, where EXPECTED holds
`pipit generate --temperature 0 --format json` samples for the prompts, and CASE is
`main` (a server with room for many sequences) or `tight` (room for one sequence, two may
wait). Exits non-zero with a message on the first check that fails.
"""

import http.client
import json
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import openai

case, url, expected_path = sys.argv[1:4]
with open(expected_path) as f:
    expected = json.load(f)
prompts = [s["prompt"] for s in expected["samples"]]
greedy = {s["prompt"]: s["text"][len(s["prompt"]):] for s in expected["samples"]}
max_tokens = expected["max_tokens"]

client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
model = client.models.list().data[0].id


def complete(prompt, **kw):
    """A completion, greedy and of `max_tokens` unless `kw` says otherwise."""
    args = {"max_tokens": max_tokens, "temperature": 0, **kw}
    return client.completions.create(model=model, prompt=prompt, **args)


def check(cond, what):
    if not cond:
        sys.exit(f"check failed: {what}")


class Answer:
    """A raw HTTP answer: its status and JSON body."""

    def __init__(self, status, body):
        self.status_code, self.body = status, body

    def json(self):
        return json.loads(self.body)


def get(path):
    with urllib.request.urlopen(url + path) as r:
        return r.read().decode()


def metric(name):
    text = get("/metrics")
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    sys.exit(f"no metric {name} in /metrics")


def raw(body):
    data = body if isinstance(body, bytes) else body.encode()
    req = urllib.request.Request(url + "/v1/completions", data=data,
                                 headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req) as r:
            return Answer(r.status, r.read())
    except urllib.error.HTTPError as e:
        return Answer(e.code, e.read())


if case == "main":
    check(json.loads(get("/health")) == {"status": "ok"}, "/health says ok")

    # Greedy completions are `pipit generate --temperature 0`'s, one prompt at a time...
    for p in prompts:
        r = complete(p)
        c = r.choices[0]
        check(c.text == greedy[p], f"greedy text of {p!r}: {c.text!r} != {greedy[p]!r}")
        check(c.finish_reason == "length", f"finish_reason {c.finish_reason}")
        check(r.usage.completion_tokens == max_tokens, f"usage {r.usage}")

    # ...and all at once, as a list.
    r = complete(prompts)
    texts = [c.text for c in sorted(r.choices, key=lambda c: c.index)]
    check(texts == [greedy[p] for p in prompts], f"a list of prompts: {texts}")

    # A streamed completion gives the same text, and the usage at the end.
    stream = complete(prompts[0], stream=True, stream_options={"include_usage": True})
    pieces, usage, reasons = [], None, []
    for chunk in stream:
        for c in chunk.choices:
            pieces.append(c.text)
            if c.finish_reason:
                reasons.append(c.finish_reason)
        if chunk.usage:
            usage = chunk.usage
    check("".join(pieces) == greedy[prompts[0]], f"streamed text {''.join(pieces)!r}")
    check(len(pieces) > 2, f"the text came in {len(pieces)} pieces")
    check(reasons == ["length"], f"streamed finish reasons {reasons}")
    check(usage is not None and usage.completion_tokens == max_tokens, f"stream usage {usage}")

    # A stop string ends the text before it.
    text = greedy[prompts[0]]
    stop = text[len(text) // 2: len(text) // 2 + 2]
    r = complete(prompts[0], stop=[stop])
    check(r.choices[0].text == text[: text.index(stop)], f"stop {stop!r}: {r.choices[0].text!r}")
    check(r.choices[0].finish_reason == "stop", "finish_reason stop")

    # Seeded sampling repeats; n choices draw from consecutive seeds.
    a = complete(prompts[0], temperature=1.0, seed=7, n=3)
    b = complete(prompts[0], temperature=1.0, seed=7, n=3)
    check([c.text for c in a.choices] == [c.text for c in b.choices], "seeded samples repeat")
    check(len({c.text for c in a.choices}) > 1, "n choices differ")

    # 64 concurrent clients, all answered with their greedy text, while malformed requests
    # are answered 400 in between.
    answers, errors = {}, []

    def one(i):
        p = prompts[i % len(prompts)]
        try:
            answers[i] = (p, complete(p).choices[0].text)
        except Exception as e:  # noqa: BLE001 - any failure is the test's
            errors.append(repr(e))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(64)]
    for t in threads:
        t.start()
    bad = [
        (raw(b'{"model": "m", "prompt": '), None),
        (raw(json.dumps({"model": model, "prompt": "a", "max_tokenz": 3})), "max_tokenz"),
        (raw(json.dumps({"model": model, "prompt": "a", "max_tokens": "x"})), "max_tokens"),
        (raw(json.dumps({"model": model, "prompt": "a", "max_tokens": 10**6})), "max_tokens"),
        (raw(json.dumps({"model": model, "prompt": "a", "temperature": -1})), "temperature"),
        (raw(json.dumps({"model": model, "prompt": ""})), "prompt"),
    ]
    for t in threads:
        t.join()
    check(not errors, f"concurrent clients failed: {errors[:3]}")
    check(len(answers) == 64, f"{len(answers)} of 64 answered")
    wrong = [i for i, (p, t) in answers.items() if t != greedy[p]]
    check(not wrong, f"concurrent answers differ from greedy: {wrong[:5]}")
    for resp, param in bad:
        body = resp.json()
        check(resp.status_code == 400, f"status {resp.status_code} for {body}")
        check(body["error"]["type"] == "invalid_request_error", f"error body {body}")
        check(body["error"]["param"] == param, f"param {body['error']['param']} != {param}")
    try:
        client.completions.create(model=model, prompt="a", max_tokens=2,
                                  extra_body={"best_of": 2})
        sys.exit("check failed: an unknown field was accepted")
    except openai.BadRequestError as e:
        check("best_of" in str(e), f"the 400 names the field: {e}")
    try:
        client.completions.create(model="another", prompt="a", max_tokens=2)
        sys.exit("check failed: another model was served")
    except openai.NotFoundError:
        pass

    # The metrics count what was done.
    check(metric("pipit_requests_total") >= 64 + len(prompts) + 5, "requests counted")
    check(metric("pipit_time_to_first_token_seconds_count") >= 64, "first tokens timed")
    check(metric("pipit_running_sequences") == 0, "nothing left running")
    check(metric("pipit_kv_cache_blocks_used") == 0, "every block returned")

elif case == "tight":
    # Room for one sequence of the whole context: a client that goes away mid-stream must
    # give its blocks back, or the next request would wait for ever.
    long_tokens = expected["window"] - 8
    address = urllib.parse.urlparse(url)
    conn = http.client.HTTPConnection(address.hostname, address.port)
    conn.request("POST", "/v1/completions", body=json.dumps({
        "model": model, "prompt": prompts[0], "max_tokens": long_tokens,
        "temperature": 1.0, "seed": 1, "stream": True,
    }), headers={"content-type": "application/json"})
    r = conn.getresponse()
    check(r.status == 200, f"stream status {r.status}")
    check(r.readline().startswith(b"data: "), "the stream's first event")
    conn.close()
    # Disconnected: the slot is reused by requests that each need the whole budget.
    for _ in range(3):
        r = client.completions.create(model=model, prompt=prompts[0], temperature=0,
                                      max_tokens=long_tokens, timeout=60)
        check(r.choices[0].finish_reason == "length", "the next request ran")
    deadline = time.time() + 10
    while metric("pipit_kv_cache_blocks_used") != 0 and time.time() < deadline:
        time.sleep(0.05)
    check(metric("pipit_kv_cache_blocks_used") == 0, "the blocks came back")

    # More choices than may wait: 429, as a RateLimitError.
    try:
        client.completions.create(model=model, prompt="a", max_tokens=2, n=5)
        sys.exit("check failed: 5 choices were queued with room for 2 waiting")
    except openai.RateLimitError:
        pass
else:
    sys.exit(f"unknown case {case}")
print(f"{case}: every check passed")

"""The official `openai` Python client against a nimmer gateway (argv[1]: its base URL, e.g.
http://127.0.0.1:8080/v1): lists models, text completions whole and streamed, embeddings (the client's
default base64 and floats), a chat completion under a JSON schema whose answer must parse and validate, and
log probabilities on chat and completions.
Prints one line per check; exits non-zero on the first failure (run by tests/openai_client.rs)."""

import json
import math
import sys

import openai

client = openai.OpenAI(base_url=sys.argv[1], api_key="unused", max_retries=0, timeout=120)
SYSTEM = "You are Mira, a dock worker in the harbour city. Answer briefly."


def check(what, ok, detail=""):
    print(("ok   " if ok else "FAIL ") + what + (f": {detail}" if detail else ""), flush=True)
    if not ok:
        sys.exit(1)


ids = [m.id for m in client.models.list()]
check("models.list names the tiers", {"driver", "theia", "saturn"} <= set(ids), ids)
check("models.list names adapters as driver:<adapter>", any(i.startswith("driver:") for i in ids), ids)

c = client.completions.create(model="driver", prompt="The harbour bell rings at", max_tokens=8, temperature=0)
check("completions.create", c.object == "text_completion" and len(c.choices[0].text) > 0, repr(c.choices[0].text))
check("completions usage", c.usage.completion_tokens > 0 and c.usage.prompt_tokens > 0, c.usage)
parts = []
finish = None
for chunk in client.completions.create(
    model="driver", prompt="The harbour bell rings at", max_tokens=8, temperature=0, stream=True
):
    parts.append(chunk.choices[0].text)
    finish = chunk.choices[0].finish_reason or finish
check("completions.create(stream=True) says the same", "".join(parts) == c.choices[0].text, repr("".join(parts)))
check("the stream ends with a finish reason", finish in ("stop", "length"), finish)

texts = ["The tide is coming in.", "The sea rises over the pier.", "I owe you three coins."]
e = client.embeddings.create(model="saturn", input=texts)  # the client asks for base64 and decodes it
vecs = [d.embedding for d in e.data]
check("embeddings.create (base64)", len(vecs) == 3 and len(vecs[0]) == 384, len(vecs[0]))
dot = lambda a, b: sum(x * y for x, y in zip(a, b))
check("embeddings are normalized", abs(dot(vecs[0], vecs[0]) - 1) < 1e-3, dot(vecs[0], vecs[0]))
check("similar lines are closer", dot(vecs[0], vecs[1]) > dot(vecs[0], vecs[2]))
f = client.embeddings.create(model="saturn", input=texts[0], encoding_format="float")
check("embeddings.create (float) matches", max(abs(a - b) for a, b in zip(f.data[0].embedding, vecs[0])) < 1e-6)
check("embeddings usage", e.usage.prompt_tokens > 0, e.usage)

schema = {
    "type": "object",
    "properties": {
        "line": {"type": "string", "maxLength": 80},
        "emotion": {"enum": ["calm", "angry", "afraid", "glad"]},
        "action": {"enum": ["none", "wave", "walk_away", "draw_weapon"]},
    },
    "required": ["line", "emotion", "action"],
    "additionalProperties": False,
}
r = client.chat.completions.create(
    model="driver",
    messages=[
        {"role": "system", "content": SYSTEM + " Answer as JSON."},
        {"role": "user", "content": "A stranger asks you the way to the market."},
    ],
    max_tokens=96,
    temperature=0,
    response_format={"type": "json_schema", "json_schema": {"name": "npc_line", "schema": schema, "strict": True}},
)
content = r.choices[0].message.content
answer = json.loads(content)
check("chat under a JSON schema parses", isinstance(answer, dict), content)
check("it has exactly the schema's keys", set(answer) == {"line", "emotion", "action"}, content)
check("line is a string within maxLength", isinstance(answer["line"], str) and len(answer["line"]) <= 80, content)
check("emotion is in its enum", answer["emotion"] in schema["properties"]["emotion"]["enum"], content)
check("action is in its enum", answer["action"] in schema["properties"]["action"]["enum"], content)
check("finish_reason is stop", r.choices[0].finish_reason == "stop", r.choices[0].finish_reason)
try:
    client.chat.completions.create(
        model="driver",
        messages=[{"role": "user", "content": "hi"}],
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strnig"}}},
    )
    check("a broken schema is refused", False)
except openai.UnprocessableEntityError as err:
    check("a broken schema is refused with 422", "strnig" in str(err), str(err)[:160])
lp = client.chat.completions.create(
    model="driver",
    messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Where is the market?"}],
    max_tokens=8,
    temperature=0,
    logprobs=True,
    top_logprobs=3,
)
content = lp.choices[0].logprobs.content
check("chat logprobs: one entry per token", len(content) == lp.usage.completion_tokens, len(content))
check("the tokens spell the answer", "".join(t.token for t in content) == lp.choices[0].message.content,
      repr("".join(t.token for t in content)))
check("log probabilities are <= 0 with 3 alternatives, most likely first",
      all(t.logprob <= 0 and len(t.top_logprobs) == 3 and
          t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob for t in content))
check("greedy takes the most likely token", all(abs(t.logprob - t.top_logprobs[0].logprob) < 1e-4 for t in content))
tc = client.completions.create(model="driver", prompt="The harbour bell rings at", max_tokens=4, temperature=0, logprobs=2)
check("completions logprobs", len(tc.choices[0].logprobs.tokens) == 4 and len(tc.choices[0].logprobs.top_logprobs[0]) == 2,
      tc.choices[0].logprobs)
print("all checks passed")

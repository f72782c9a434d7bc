// Check llmaas's OpenAI-compatible API with the npm `openai` package (Node 20+).
//
// Run by scripts/check_clients.sh:
//     OPENAI_NODE_PREFIX=DIR LLMAAS_BASE_URL=http://127.0.0.1:PORT LLMAAS_KEY=KEY node check_openai.mjs
// where DIR holds node_modules/openai (`npm install --prefix DIR openai`).
//
// The same checks as check_python_clients.py: list the models and use the returned id; a plain chat completion
// (system + user message, greedy); the same request streamed, whose concatenated deltas must equal the plain reply;
// one call on a persistent context with the extension field `llmaas: {context_id}` passed directly in the body and
// only the new user message, after which the context must hold that turn. Prints exactly one line on stdout,
// `PASS openai-node` or `FAIL openai-node: reason`, and exits 0 or 1; details go to stderr.

import { createRequire } from "node:module";
import { join } from "node:path";

const NAME = "openai-node";
const SYSTEM = "You are a terse assistant. Answer in a few words.";
const USER = "Name a primary colour.";
const CONTEXT_SYSTEM = "You are a helpful assistant who answers in one short sentence.";
const CONTEXT_USER = "What is the capital of France?";
const MAX_TOKENS = 8;

class CheckFailed extends Error {}

const T0 = performance.now();
const note = (text) => console.error(`  [${((performance.now() - T0) / 1000).toFixed(1).padStart(5)} s] ${text}`);

const oneLine = (s) => String(s).split(/\s+/).filter(Boolean).join(" ");
const repr = (s) => JSON.stringify(s);

function describe(err) {
  if (err instanceof CheckFailed) return err.message;
  // openai's APIError's message starts with the HTTP status, followed by the service's error message
  return `${err?.constructor?.name ?? "Error"}: ${oneLine(err?.message ?? err)}`;
}

async function runChecks(client) {
  let step = "list models";
  try {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    if (ids.length === 0) throw new CheckFailed("no model listed");
    const model = ids[0];
    note(`model: ${repr(model)}`);

    step = "plain chat";
    const messages = [{ role: "system", content: SYSTEM }, { role: "user", content: USER }];
    const params = { model, messages, max_tokens: MAX_TOKENS, temperature: 0 };
    const plain = await client.chat.completions.create(params);
    const reply = plain.choices[0].message.content;
    const finish = plain.choices[0].finish_reason;
    note(`plain reply: ${repr(reply)} (finish_reason ${repr(finish)})`);
    if (typeof reply !== "string" || reply === "") throw new CheckFailed(`empty or non-text reply ${repr(reply)}`);
    if (finish !== "stop" && finish !== "length") throw new CheckFailed(`finish_reason ${repr(finish)}`);

    step = "streamed chat";
    const stream = await client.chat.completions.create({ ...params, stream: true });
    const deltas = [];
    for await (const chunk of stream) {
      if (chunk.choices && chunk.choices.length) deltas.push(chunk.choices[0].delta?.content ?? "");
    }
    const streamed = deltas.join("");
    note(`streamed reply: ${repr(streamed)} (${deltas.length} chunks)`);
    if (streamed !== reply) {
      throw new CheckFailed(`the stream ${repr(streamed)} differs from the plain reply ${repr(reply)} (both greedy)`);
    }

    step = "context call";
    const ctx = (await client.post("/contexts", { body: { system_prompt: CONTEXT_SYSTEM } })).id;
    const onCtx = await client.chat.completions.create({
      model, messages: [{ role: "user", content: CONTEXT_USER }], max_tokens: MAX_TOKENS, temperature: 0,
      llmaas: { context_id: ctx },  // extension field, passed directly in the body
    });
    const ctxReply = onCtx.choices[0].message.content;
    note(`context ${ctx}: reply ${repr(ctxReply)}`);
    if (typeof ctxReply !== "string" || ctxReply === "") {
      throw new CheckFailed(`empty or non-text reply ${repr(ctxReply)}`);
    }
    const held = await client.get(`/contexts/${ctx}`);
    const turn = held.messages.slice(-2).map((m) => [m.role, m.content]);
    if (held.num_calls !== 1 || repr(turn) !== repr([["user", CONTEXT_USER], ["assistant", ctxReply]])) {
      throw new CheckFailed(`the context does not hold the turn (was llmaas.context_id sent?): num_calls `
        + `${held.num_calls}, last messages ${repr(turn)}`);
    }
    note(`the context holds the turn (${held.num_calls} call)`);
  } catch (err) {
    if (!(err instanceof CheckFailed)) console.error(err);
    throw new CheckFailed(`${step}: ${describe(err)}`);
  }
}

async function main() {
  const prefix = process.env.OPENAI_NODE_PREFIX;
  const baseURL = process.env.LLMAAS_BASE_URL;
  const apiKey = process.env.LLMAAS_KEY;
  try {
    if (!prefix || !baseURL || !apiKey) {
      throw new CheckFailed("set OPENAI_NODE_PREFIX, LLMAAS_BASE_URL and LLMAAS_KEY");
    }
    const openai = createRequire(join(prefix, "package.json"))("openai");
    const OpenAI = openai.OpenAI ?? openai.default;
    note(`openai-node ${OpenAI.VERSION ?? ""}`.trimEnd());
    const client = new OpenAI({ baseURL: baseURL.replace(/\/$/, "") + "/v1", apiKey, maxRetries: 0, timeout: 120_000 });
    await runChecks(client);
  } catch (err) {
    if (!(err instanceof CheckFailed)) console.error(err);
    console.log(`FAIL ${NAME}: ${oneLine(describe(err))}`);
    return 1;
  }
  console.log(`PASS ${NAME}`);
  return 0;
}

process.exitCode = await main();

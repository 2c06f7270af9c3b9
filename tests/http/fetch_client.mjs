// The HTTP API from Node.js with fetch alone (Node 18+; no npm package).
// Usage: node fetch_client.mjs BASE_URL TOKEN IMAGE.png
// Prints one JSON line: a text's vector (/v1/embeddings), an image's float and int8 vectors
// (/v2/embed), and the status of a call without the token.
import { readFileSync } from "node:fs";

const [baseUrl, token, imagePath] = process.argv.slice(2);
const headers = { "content-type": "application/json", authorization: `Bearer ${token}` };

async function post(path, body) {
  const reply = await fetch(baseUrl + path, { method: "POST", headers, body: JSON.stringify(body) });
  const json = await reply.json();
  if (!reply.ok) throw new Error(`${path}: ${reply.status} ${JSON.stringify(json)}`);
  return json;
}

const image = "data:image/png;base64," + readFileSync(imagePath).toString("base64");
const openai = await post("/v1/embeddings", { model: "tiny", input: "hello from node" });
const cohere = await post("/v2/embed", {
  model: "tiny",
  images: [image],
  input_type: "image",
  embedding_types: ["float", "int8"],
});
const refused = await fetch(baseUrl + "/v1/models");
console.log(
  JSON.stringify({
    text: openai.data[0].embedding,
    image: cohere.embeddings.float[0],
    int8: cohere.embeddings.int8[0],
    unauthenticated: refused.status,
  }),
);

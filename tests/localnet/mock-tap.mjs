// A scriptable stand-in for a tap server, to exercise tap clients (our own
// tests, tap-consumer.mjs) before/without the real server. It speaks the wire
// protocol of spec §3.1-§3.3 closely enough for the reference client; it does
// NOT implement tap's semantics (no backfill, no ordering, no redelivery).
//
// Env: PORT=0 (0 = free port; see READY), TAP_ADMIN_PASSWORD= (if set, every
//      request needs Basic admin auth, else 401 like the real server)
//
// stdout (JSON lines; the first is "READY {json}"):
//   READY {"url":"http://127.0.0.1:P","port":P}
//   {"kind":"http","method":...,"path":...,"auth":...,"contentType":...,"body":"..."}
//   {"kind":"connection","conn":n,"auth":...}      a /channel websocket opened
//   {"kind":"ack","conn":n,"id":N}                  client frame {"type":"ack","id":N}
//   {"kind":"message","conn":n,"binary":bool,"text":"..."}   any other client frame
//   {"kind":"disconnect","conn":n,"code":n}
//   {"kind":"response","cmd":...,"ok":bool,...}     answer to a stdin command
// stdin commands (JSON lines, optional "reqId" echoed back):
//   {"cmd":"send","event":{...}}   send one event as a compact JSON text frame
//   {"cmd":"send","raw":"..."}     send a raw text frame (e.g. malformed JSON)
//        frames go to one open connection (round robin); queued while none is open
//   {"cmd":"close","code":1000}    close every connection with a close frame
//   {"cmd":"drop"}                 drop every connection without a close frame (client sees 1006)
//   {"cmd":"setInfo","did":...,"info":{...}}   body served by GET /info/<did>
//   {"cmd":"setDidDoc","did":...,"doc":{...}}  body served by GET /resolve/<did>
//   {"cmd":"state"}                -> {repos:[...], acked:[ids], connections:n, queued:n}
//   {"cmd":"exit"}                 (stdin EOF exits too)
import http from 'node:http'
import readline from 'node:readline'
import { WebSocketServer } from 'ws'

const writeLine = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const env = process.env
const PASSWORD = env.TAP_ADMIN_PASSWORD || ''
const expectedAuth = PASSWORD ? 'Basic ' + Buffer.from(`admin:${PASSWORD}`).toString('base64') : null

const repos = new Set()
const infos = new Map()
const didDocs = new Map()
const acked = []
const conns = new Map() // conn number -> ws
let connCounter = 0
let rr = 0
const queue = []

const sendJson = (res, status, obj) => {
  const body = obj === undefined ? '' : JSON.stringify(obj) + '\n'
  res.writeHead(status, obj === undefined ? {} : { 'content-type': 'application/json' })
  res.end(body)
}

const authorized = (req) => !expectedAuth || req.headers.authorization === expectedAuth

const refuse = (res) => {
  res.writeHead(401, {
    'content-type': 'application/json',
    'www-authenticate': 'Basic realm="admin", charset="UTF-8"',
  })
  res.end(JSON.stringify({ error: 'Unauthorized', message: 'atproto admin auth required, but missing or incorrect password' }))
}

const server = http.createServer((req, res) => {
  const chunks = []
  req.on('data', (c) => chunks.push(c))
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString()
    const path = new URL(req.url, 'http://x').pathname
    writeLine({
      kind: 'http',
      method: req.method,
      path,
      auth: req.headers.authorization ?? null,
      contentType: req.headers['content-type'] ?? null,
      body,
    })
    if (!authorized(req)) return refuse(res)
    route(req.method, path, body, res)
  })
})

function route(method, path, body, res) {
  if (method === 'GET' && path === '/health') return sendJson(res, 200, { status: 'ok' })
  if (method === 'POST' && (path === '/repos/add' || path === '/repos/remove')) {
    let dids
    try {
      dids = body === '' ? [] : JSON.parse(body).dids
    } catch (err) {
      return sendJson(res, 400, { message: `Syntax error: ${err.message}` })
    }
    if (!Array.isArray(dids)) return sendJson(res, 400, { message: 'dids must be an array' })
    for (const did of dids) {
      if (path === '/repos/add') repos.add(did)
      else repos.delete(did)
    }
    return sendJson(res, 200)
  }
  const info = path.match(/^\/info\/(.+)$/)
  if (method === 'GET' && info) {
    const did = decodeURIComponent(info[1])
    if (infos.has(did)) return sendJson(res, 200, infos.get(did))
    if (repos.has(did)) {
      return sendJson(res, 200, { did, handle: '', state: 'pending', rev: '', error: '', retries: 0, records: 0 })
    }
    return sendJson(res, 404, { message: 'repo not found' })
  }
  const resolve = path.match(/^\/resolve\/(.+)$/)
  if (method === 'GET' && resolve) {
    const did = decodeURIComponent(resolve[1])
    if (didDocs.has(did)) return sendJson(res, 200, didDocs.get(did))
    return sendJson(res, 404, { message: 'DID not found' })
  }
  return sendJson(res, 404, { message: 'Not Found' })
}

const wss = new WebSocketServer({ noServer: true })
server.on('upgrade', (req, socket, head) => {
  const path = new URL(req.url, 'http://x').pathname
  if (!authorized(req) || path !== '/channel') {
    const status = authorized(req) ? '404 Not Found' : '401 Unauthorized'
    writeLine({ kind: 'http', method: 'GET', path, auth: req.headers.authorization ?? null, upgrade: true, refused: status })
    socket.end(`HTTP/1.1 ${status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n`)
    return
  }
  wss.handleUpgrade(req, socket, head, (ws) => {
    const conn = ++connCounter
    conns.set(conn, ws)
    writeLine({ kind: 'connection', conn, auth: req.headers.authorization ?? null })
    ws.on('message', (data, binary) => {
      const text = data.toString()
      let msg
      try {
        msg = JSON.parse(text)
      } catch {
        msg = null
      }
      if (msg?.type === 'ack' && Number.isInteger(msg.id)) {
        acked.push(msg.id)
        writeLine({ kind: 'ack', conn, id: msg.id })
      } else {
        writeLine({ kind: 'message', conn, binary, text })
      }
    })
    ws.on('close', (code) => {
      conns.delete(conn)
      writeLine({ kind: 'disconnect', conn, code })
    })
    flush()
  })
})

// Deliver queued frames, each to one open connection in turn.
function flush() {
  while (queue.length > 0) {
    const open = [...conns.values()].filter((ws) => ws.readyState === ws.OPEN)
    if (open.length === 0) return
    const ws = open[rr++ % open.length]
    ws.send(queue.shift())
  }
}

const commands = {
  send: async (a) => {
    if (a.raw !== undefined) queue.push(String(a.raw))
    else if (a.event !== undefined) queue.push(JSON.stringify(a.event))
    else throw new Error('send needs "event" or "raw"')
    flush()
    return { queued: queue.length }
  },
  close: async (a) => {
    for (const ws of conns.values()) ws.close(a.code ?? 1000)
    return {}
  },
  drop: async () => {
    for (const ws of conns.values()) ws.terminate()
    return {}
  },
  setInfo: async (a) => {
    infos.set(a.did, a.info)
    return {}
  },
  setDidDoc: async (a) => {
    didDocs.set(a.did, a.doc)
    return {}
  },
  state: async () => ({ repos: [...repos], acked: [...acked], connections: conns.size, queued: queue.length }),
  exit: async () => ({}),
}

const shutdown = () => {
  for (const ws of conns.values()) ws.terminate()
  server.close()
  process.exit(0)
}

server.listen(Number(env.PORT || 0), '127.0.0.1', () => {
  const { port } = server.address()
  process.stdout.write('READY ' + JSON.stringify({ url: `http://127.0.0.1:${port}`, port }) + '\n')
})

const rl = readline.createInterface({ input: process.stdin, crlfDelay: Infinity })
let chain = Promise.resolve()
rl.on('line', (line) => {
  chain = chain.then(async () => {
    if (line.trim() === '') return
    let msg
    try {
      msg = JSON.parse(line)
    } catch (err) {
      writeLine({ kind: 'response', ok: false, error: `invalid JSON: ${err.message}` })
      return
    }
    const echo = msg?.reqId === undefined ? {} : { reqId: msg.reqId }
    const fn = commands[msg?.cmd]
    if (!fn) {
      writeLine({ kind: 'response', cmd: msg?.cmd, ok: false, ...echo, error: `unknown cmd ${JSON.stringify(msg?.cmd)}` })
      return
    }
    try {
      writeLine({ kind: 'response', cmd: msg.cmd, ok: true, ...echo, ...(await fn(msg)) })
    } catch (err) {
      writeLine({ kind: 'response', cmd: msg.cmd, ok: false, ...echo, error: err.message })
    }
    if (msg.cmd === 'exit') shutdown()
  })
})
rl.on('close', () => {
  chain = chain.then(shutdown)
})
process.on('SIGINT', shutdown)
process.on('SIGTERM', shutdown)

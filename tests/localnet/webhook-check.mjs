// Webhook receiver that judges each delivery with the reference client's own
// helpers from @atproto/tap: the body must parse as a tap event (strict
// atproto JSON, then parseTapEvent, as the channel client does) and, when
// TAP_ADMIN_PASSWORD is set, the Authorization header must pass assureAdminAuth.
// Answers 200 when both hold, 400 otherwise.
//
// Env: PORT=0 (0 = free port), TAP_ADMIN_PASSWORD= (optional)
// stdout (JSON lines):
//   READY {"url":"http://127.0.0.1:P/","port":P}
//   {"kind":"request","ok":true,"status":200,"method":"POST","path":"/...","event":{...}}
//   {"kind":"request","ok":false,"status":400|...,"method":...,"path":...,"error":"...","body":"..."}
//   {"kind":"response","cmd":...,"ok":bool,...}     answer to a stdin command
// stdin commands (JSON lines, optional "reqId" echoed back):
//   {"cmd":"failNext","n":2,"status":503}   answer the next n valid deliveries with
//                                           that status (default 500), to test retries
//   {"cmd":"stats"}                          -> {accepted, rejected, failedOnPurpose}
//   {"cmd":"exit"}                           (stdin EOF exits too)
import http from 'node:http'
import readline from 'node:readline'
import { lexParse, lexToJson } from '@atproto/lex'
import { assureAdminAuth, parseTapEvent } from '@atproto/tap'

const writeLine = (obj) => process.stdout.write(JSON.stringify(obj) + '\n')
const env = process.env
const PASSWORD = env.TAP_ADMIN_PASSWORD || ''

let failNext = 0
let failStatus = 500
const stats = { accepted: 0, rejected: 0, failedOnPurpose: 0 }

const server = http.createServer((req, res) => {
  const chunks = []
  req.on('data', (c) => chunks.push(c))
  req.on('end', () => {
    const body = Buffer.concat(chunks).toString()
    const base = { kind: 'request', method: req.method, path: new URL(req.url, 'http://x').pathname }
    const answer = (status) => {
      res.writeHead(status)
      res.end()
    }
    try {
      if (req.method !== 'POST') throw new Error(`expected POST, got ${req.method}`)
      if (PASSWORD) assureAdminAuth(PASSWORD, req.headers.authorization ?? '')
      const evt = parseTapEvent(lexParse(body, { strict: true }))
      if (failNext > 0) {
        failNext--
        stats.failedOnPurpose++
        writeLine({ ...base, ok: false, status: failStatus, error: 'failNext', event: lexToJson(evt) })
        return answer(failStatus)
      }
      stats.accepted++
      writeLine({ ...base, ok: true, status: 200, event: lexToJson(evt) })
      answer(200)
    } catch (err) {
      stats.rejected++
      const cause = err?.cause?.message
      writeLine({ ...base, ok: false, status: 400, error: err.message + (cause ? `: ${cause}` : ''), body })
      answer(400)
    }
  })
})

const commands = {
  failNext: async (a) => {
    failNext = Number(a.n ?? 1)
    failStatus = Number(a.status ?? 500)
    return { failNext, status: failStatus }
  },
  stats: async () => ({ ...stats }),
  exit: async () => ({}),
}

const shutdown = () => {
  server.close()
  process.exit(0)
}

server.listen(Number(env.PORT || 0), '127.0.0.1', () => {
  const { port } = server.address()
  process.stdout.write('READY ' + JSON.stringify({ url: `http://127.0.0.1:${port}/`, port }) + '\n')
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
    writeLine({ kind: 'response', cmd: msg.cmd, ok: true, ...echo, ...(await fn(msg)) })
    if (msg.cmd === 'exit') shutdown()
  })
})
rl.on('close', () => {
  chain = chain.then(shutdown)
})
process.on('SIGINT', shutdown)
process.on('SIGTERM', shutdown)

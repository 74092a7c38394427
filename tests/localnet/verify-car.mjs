// Verifies a repo CAR file with the reference implementation (@atproto/repo):
//   * every block's CID matches its bytes (readCarWithRoot);
//   * the single root is a commit for <did> whose signature verifies against
//     <signing did:key> (skipped when "-" is given);
//   * the MST walks cleanly and every record block it points to is present
//     (verifyRepo with ensureLeaves);
//   * the MST is canonical: rebuilding it from its (key, CID) leaves with the
//     reference MST code gives the same root CID as the commit's `data`.
//
// usage: node verify-car.mjs <car-file> <did> <signing did:key | -> [--list]
// stdout: one JSON line {ok, did, records (count), root, rev, data, version, signatureChecked, mstCanonical, blocks}
//   with --list, "paths" holds [{path, cid}] for every record, sorted by path.
// On failure: {ok:false, error} and exit code 1 (usage errors exit 2).
import fs from 'node:fs/promises'
import { MST, MemoryBlockstore, cborToLex, readCarWithRoot, verifyRepo } from '@atproto/repo'

const args = process.argv.slice(2)
const list = args.includes('--list')
const [carPath, did, keyArg] = args.filter((a) => a !== '--list')
if (!carPath || !did || !keyArg) {
  console.error('usage: node verify-car.mjs <car-file> <did> <signing did:key | -> [--list]')
  process.exit(2)
}
const signingKey = keyArg === '-' ? undefined : keyArg

const fail = (err) => {
  process.stdout.write(JSON.stringify({ ok: false, error: err?.message ?? String(err) }) + '\n')
  process.exit(1)
}

try {
  const bytes = new Uint8Array(await fs.readFile(carPath))
  // CID-to-content checks happen here (skipCidVerification defaults to false)
  const { root, blocks } = await readCarWithRoot(bytes)
  const rootBlock = blocks.get(root)
  if (!rootBlock) throw new Error(`root block ${root} is not in the CAR`)
  // The raw commit fields (before the loader's v2 -> v3 normalisation);
  // verifyRepo below checks that this block really is a valid signed commit.
  const commit = cborToLex(rootBlock)

  const verified = await verifyRepo(blocks, root, did, signingKey, { ensureLeaves: true })

  // Canonical-structure check: the MST shape is fully determined by its keys,
  // so a fresh tree built from the same leaves must hash to the same root.
  let rebuilt = await MST.create(new MemoryBlockstore())
  const paths = []
  for (const c of verified.creates) {
    const key = `${c.collection}/${c.rkey}`
    rebuilt = await rebuilt.add(key, c.cid)
    paths.push({ path: key, cid: c.cid.toString() })
  }
  const rebuiltRoot = await rebuilt.getPointer()
  const mstCanonical = rebuiltRoot.equals(commit.data)
  if (!mstCanonical) {
    throw new Error(`MST is not canonical: commit data ${commit.data}, rebuilt ${rebuiltRoot}`)
  }

  paths.sort((x, y) => (x.path < y.path ? -1 : x.path > y.path ? 1 : 0))
  const out = {
    ok: true,
    did: commit.did,
    records: verified.creates.length,
    root: root.toString(),
    rev: commit.rev,
    data: commit.data.toString(),
    version: commit.version,
    signatureChecked: signingKey !== undefined,
    mstCanonical,
    blocks: blocks.size,
  }
  if (list) out.paths = paths
  process.stdout.write(JSON.stringify(out) + '\n')
} catch (err) {
  fail(err)
}

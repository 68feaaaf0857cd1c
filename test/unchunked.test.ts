/**
 * UnchunkedSink over a real socket pair: what the client of an HTTP/1.0
 * stream reads is the head, then the frames' payloads with no chunk framing,
 * each write to the sink one write to the socket.
 */
import { once } from 'node:events'
import type { Socket } from 'node:net'
import t, { type Test } from 'tap'
import { chunkOfText, END_CHUNK } from '../src/core/framing'
import { UnchunkedSink } from '../src/core/unchunked'
import { loopbackPair } from './helpers/raw'
import { within } from './helpers/wait'

/** The server side of a loopback connection, and everything its peer reads until the close. */
async function socketPair (t: Test): Promise<{ server: Socket, received: Promise<Buffer> }> {
  const { server, client } = await loopbackPair(t)
  const parts: Buffer[] = []
  client.on('data', (part: Buffer) => parts.push(part))
  const received = once(client, 'close').then(() => Buffer.concat(parts))
  return { server, received }
}

t.test('the head passes as it is, even split across writes; runs of chunks lose their framing, payloads holding CRLF or "0\\r\\n\\r\\n" included; one socket write per sink write', async (t) => {
  const { server, received } = await socketPair(t)
  let socketWrites = 0
  const write = server.write.bind(server) as (chunk: Buffer, callback?: (error?: Error | null) => void) => boolean
  server.write = ((chunk: Buffer, callback?: (error?: Error | null) => void) => {
    socketWrites++
    return write(chunk, callback)
  }) as typeof server.write
  const head = Buffer.from('HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n')
  const sink = new UnchunkedSink(server, head.length)
  const payloads = ['retry: 3000\n\n', 'data: a\r\ndata: 0\r\n\r\n\n\n', 'id: 7\ndata: ' + 'x'.repeat(70_000) + '\n\n']
  const frames = payloads.map((payload) => chunkOfText(payload))
  sink.write(head.subarray(0, 10))
  sink.write(Buffer.concat([head.subarray(10), frames[0]]))
  const callbacks: Array<Error | null | undefined> = []
  sink.write(Buffer.concat([frames[1], frames[2], END_CHUNK]), (error) => callbacks.push(error))
  t.equal(socketWrites, 3, 'each sink write was one socket write')
  server.end()
  const body = await within(received, 5000, 'the close')
  t.equal(body.toString('latin1'), head.toString('latin1') + payloads.join(''), 'head, then the payloads, nothing else')
  t.same(callbacks, [null], 'the write\'s callback was called once, without an error')
  const given = head.length + frames.reduce((sum, frame) => sum + frame.length, 0) + END_CHUNK.length
  t.equal(given - sink.droppedFraming, body.length, 'what it says it dropped is what the client did not get')
})

t.test('a write that is not whole chunks ends the stream and fails its callback, rather than send garbage', async (t) => {
  const { server, received } = await socketPair(t)
  const sink = new UnchunkedSink(server, 0)
  const frame = chunkOfText('data: whole\n\n')
  const failed = new Promise<Error | null | undefined>((resolve) => sink.write(frame.subarray(0, frame.length - 4), resolve))
  t.ok(await within(failed, 5000, 'the callback') instanceof Error, 'the callback gets an error')
  t.equal((await within(received, 5000, 'the close')).length, 0, 'nothing of it was sent')
  t.ok(sink.destroyed)
})

import type { Sink } from './connection'

const CRLF = Buffer.from('\r\n')

/**
 * The sink of a stream whose client speaks HTTP/1.0 (nginx's default to an
 * upstream), which knows no chunked coding: every frame loses its chunk
 * framing on the way out, and the body ends when the connection closes. The
 * head, written first, passes as it is. Frames are still rendered once for
 * every recipient; only these streams pay for taking them apart (a copy per
 * write).
 */
export class UnchunkedSink implements Sink {
  private headLeft: number
  droppedFraming = 0

  constructor (private readonly socket: Sink, headBytes: number) {
    this.headLeft = headBytes
  }

  get writableLength (): number {
    return this.socket.writableLength
  }

  get destroyed (): boolean {
    return this.socket.destroyed
  }

  /** `chunk` is the head's rest, if any, then whole chunks (what every other sink is written). */
  write (chunk: Buffer, callback?: (error?: Error | null) => void): boolean {
    const payloads: Buffer[] = []
    let payloadBytes = 0
    let offset = 0
    if (this.headLeft > 0) {
      offset = Math.min(this.headLeft, chunk.length)
      this.headLeft -= offset
      payloads.push(chunk.subarray(0, offset))
      payloadBytes = offset
    }
    while (offset < chunk.length) {
      const sizeEnd = chunk.indexOf(CRLF, offset)
      const size = sizeEnd === -1 ? NaN : parseInt(chunk.toString('latin1', offset, sizeEnd), 16)
      const start = sizeEnd + 2
      const end = start + size
      // Never the case (every frame is a whole chunk); were it, the stream
      // ends rather than carry garbage.
      if (!Number.isInteger(size) || size < 0 || end + 2 > chunk.length || chunk[end] !== 13 || chunk[end + 1] !== 10) {
        this.socket.destroy()
        if (callback !== undefined) process.nextTick(callback, new Error('a stream frame is not a whole chunk'))
        return false
      }
      // The last chunk (size 0) has nothing to carry: the close ends the body.
      if (size > 0) {
        payloads.push(chunk.subarray(start, end))
        payloadBytes += size
      }
      offset = end + 2
    }
    this.droppedFraming += chunk.length - payloadBytes
    // One write, as for every other sink: behind a slow reader Node queues
    // each write with an overhead of its own, which the bound on a stream's
    // unsent bytes would not see.
    return this.socket.write(payloads.length === 1 ? payloads[0] : Buffer.concat(payloads), callback)
  }

  end (): void {
    this.socket.end()
  }

  destroy (): void {
    this.socket.destroy()
  }

  resetAndDestroy (): void {
    this.socket.resetAndDestroy()
  }

  on (event: 'close', listener: () => void): unknown {
    return this.socket.on(event, listener)
  }

  once (event: 'drain' | 'close' | 'finish', listener: () => void): unknown {
    return this.socket.once(event, listener)
  }

  off (event: 'drain' | 'close', listener: () => void): unknown {
    return this.socket.off(event, listener)
  }
}

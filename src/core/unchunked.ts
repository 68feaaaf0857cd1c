import type { Sink } from './connection'

/** A socket, as far as UnchunkedSink needs one. */
export interface CorkableSink extends Sink {
  cork (): void
  uncork (): void
}

const CRLF = Buffer.from('\r\n')

/**
 * The sink of a stream whose client speaks HTTP/1.0 (nginx's default to an
 * upstream), which knows no chunked coding: every frame loses its chunk
 * framing on the way out, and the body ends when the connection closes. The
 * head, written first, passes as it is. Frames are still rendered once for
 * every recipient; only these streams pay for taking them apart.
 */
export class UnchunkedSink implements Sink {
  private headLeft: number

  constructor (private readonly socket: CorkableSink, headBytes: number) {
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
    let offset = 0
    if (this.headLeft > 0) {
      offset = Math.min(this.headLeft, chunk.length)
      this.headLeft -= offset
      payloads.push(chunk.subarray(0, offset))
    }
    while (offset < chunk.length) {
      const sizeEnd = chunk.indexOf(CRLF, offset)
      // Never the case (every frame is a whole chunk); were it, the stream ends rather than carry garbage.
      if (sizeEnd === -1) {
        this.socket.destroy()
        return false
      }
      const size = parseInt(chunk.toString('latin1', offset, sizeEnd), 16)
      const start = sizeEnd + 2
      // The last chunk (size 0) has nothing to carry: the close ends the body.
      if (size > 0) payloads.push(chunk.subarray(start, start + size))
      offset = start + size + 2
    }
    if (payloads.length === 0) return this.socket.write(Buffer.alloc(0), callback)
    if (payloads.length === 1) return this.socket.write(payloads[0], callback)
    // Corked, the pieces leave in one writev.
    this.socket.cork()
    for (let index = 0; index < payloads.length - 1; index++) this.socket.write(payloads[index])
    const flushed = this.socket.write(payloads[payloads.length - 1], callback)
    this.socket.uncork()
    return flushed
  }

  end (): void {
    this.socket.end()
  }

  destroy (): void {
    this.socket.destroy()
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

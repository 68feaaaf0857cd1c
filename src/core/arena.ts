/**
 * Lays the frames of successive deliveries back to back in shared slabs, so a
 * stream that receives several of them in a row can write the whole run as one
 * view of the slab: no copy and no allocation per recipient, however many
 * streams the events go to.
 *
 * A slab lives as long as any view of it: pending writes, replay buffers and
 * Node's queue of a socket that is behind (which gets copies instead, see
 * StreamConnection.flush), so slabs are kept small.
 */
export class FrameArena {
  private slab: Buffer
  private used = 0
  private lastSource: Buffer | null = null
  private lastPlaced: Buffer | null = null

  constructor (private readonly slabBytes = 32 * 1024) {
    this.slab = Buffer.allocUnsafeSlow(slabBytes)
  }

  /** The frame's bytes, right after those placed before when they fit. */
  place (frame: Buffer): Buffer {
    // One event goes to several channels in a row (users, members): place it once.
    if (frame === this.lastSource && this.lastPlaced !== null) return this.lastPlaced
    if (frame.length > this.slabBytes >> 2) return frame
    if (this.used + frame.length > this.slabBytes) {
      this.slab = Buffer.allocUnsafeSlow(this.slabBytes)
      this.used = 0
    }
    const placed = this.slab.subarray(this.used, this.used + frame.length)
    frame.copy(placed)
    this.used += frame.length
    this.lastSource = frame
    this.lastPlaced = placed
    return placed
  }
}

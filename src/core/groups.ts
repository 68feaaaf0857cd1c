/**
 * Members by key, where a key's only member is held without a Set of its
 * own: most users hold one stream and most user channels have one listener,
 * and at tens of thousands of them a Set each is most of their memory.
 * Members must not themselves be Sets.
 */
export class Groups<Member extends object> {
  private readonly groups = new Map<string, Member | Set<Member>>()

  /** Keys with at least one member. */
  get size (): number {
    return this.groups.size
  }

  has (key: string): boolean {
    return this.groups.has(key)
  }

  /** The key's member, or its Set when it has several (read only), for loops that must not allocate. */
  lookup (key: string): Member | Set<Member> | undefined {
    return this.groups.get(key)
  }

  add (key: string, member: Member): void {
    const group = this.groups.get(key)
    if (group === undefined) this.groups.set(key, member)
    else if (group instanceof Set) group.add(member)
    else if (group !== member) this.groups.set(key, new Set([group, member]))
  }

  /** Returns false when the member was not in the key's group. */
  delete (key: string, member: Member): boolean {
    const group = this.groups.get(key)
    if (group === undefined) return false
    if (!(group instanceof Set)) {
      if (group !== member) return false
      this.groups.delete(key)
      return true
    }
    if (!group.delete(member)) return false
    // A loop may still be walking the Set; it stays valid, the map moves on.
    if (group.size === 1) this.groups.set(key, group.values().next().value as Member)
    return true
  }

  count (key: string): number {
    const group = this.groups.get(key)
    return group === undefined ? 0 : sizeOf(group)
  }

  members (key: string): Member[] {
    const group = this.groups.get(key)
    if (group === undefined) return []
    return group instanceof Set ? [...group] : [group]
  }

  counts (): Map<string, number> {
    const counts = new Map<string, number>()
    for (const [key, group] of this.groups) counts.set(key, sizeOf(group))
    return counts
  }
}

function sizeOf<Member> (group: Member | Set<Member>): number {
  return group instanceof Set ? group.size : 1
}

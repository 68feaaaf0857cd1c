/** How many lines of header `lowerName` a request head holds (`rawHeaders`: name, value, name, value…): Node keeps only the first of some. */
export function headerLines (rawHeaders: string[], lowerName: string): number {
  let count = 0
  for (let index = 0; index < rawHeaders.length; index += 2) {
    const name = rawHeaders[index]
    if (name.length === lowerName.length && name.toLowerCase() === lowerName) count++
  }
  return count
}

/** A header or cookie value without the double quotes HTTP allows around it. */
export function unquoted (value: string): string {
  return value.length >= 2 && value.startsWith('"') && value.endsWith('"') ? value.slice(1, -1) : value
}

/** A header or cookie value without the double quotes HTTP allows around it. */
export function unquoted (value: string): string {
  return value.length >= 2 && value.startsWith('"') && value.endsWith('"') ? value.slice(1, -1) : value
}

-- Prelude: the index of the PNGs kept in Redis for the API replicas to copy. sizes: name -> bytes; uncopied:
-- the PNGs no replica has copied yet, by age (never dropped before a copy: no expiry, no eviction); order:
-- the PNGs a replica has copied, by age (they expire, and the oldest go first to make room); total and
-- uncopied_total: bytes of all of them, and of the uncopied ones.
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function png_index(png_prefix, copies_prefix, sizes, order, total, uncopied, uncopied_total)
  return {png = png_prefix, copies = copies_prefix, sizes = sizes, order = order, total = total,
          uncopied = uncopied, uncopied_total = uncopied_total}
end
local function drop_png(name, index)
  local size = tonumber(redis.call('HGET', index.sizes, name) or '0')
  redis.call('DEL', index.png .. name, index.copies .. name)
  redis.call('HDEL', index.sizes, name)
  redis.call('ZREM', index.order, name)
  local was_uncopied = redis.call('ZREM', index.uncopied, name) == 1
  if size > 0 then
    redis.call('DECRBY', index.total, size)
    if was_uncopied then redis.call('DECRBY', index.uncopied_total, size) end
  end
end

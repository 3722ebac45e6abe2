-- Deletes one route of tunnelbot's from traefik's Redis, if it is still ours, in one atomic
-- step (traefik_redis.rs `delete`). It touches only the keys it is given or can name from
-- them, never SCANs: a script cannot be interrupted, so its work must not grow with the
-- keyspace.
--
-- KEYS[1]    the route's stamp (data/tunnelbot)
-- KEYS[2]    its target (<jh>/routes/<router>/target)
-- KEYS[3..]  the other keys its layout names (traefik_keys.rs `named_keys`)
-- ARGV[1]    "http://<tunnel host>:"
-- ARGV[2..3] the first and last port of tunnels.ports
-- ARGV[4]    the router's key dir, ending in "/"
-- ARGV[5]    the service's key dir, ending in "/"
--
-- Returns the number of keys deleted; 0 when there is no stamp (absent, or the hub's own
-- route), -1 when the stamp is there but the target is not ours: the hub rewrote the path for
-- a server that is not behind a tunnel, and that route is left alone.

-- A key that is not a string is nobody's route value.
local function get(key)
    local v = redis.pcall("GET", key)
    if type(v) == "string" then
        return v
    end
    return nil
end

if get(KEYS[1]) ~= "true" then
    return 0
end
local target = get(KEYS[2])
if target == nil or string.sub(target, 1, #ARGV[1]) ~= ARGV[1] then
    return -1
end
local port = string.sub(target, #ARGV[1] + 1)
if not string.match(port, "^%d%d?%d?%d?%d?$") then
    return -1
end
port = tonumber(port)
if port < tonumber(ARGV[2]) or port > tonumber(ARGV[3]) then
    return -1
end

-- Checked: the route is ours and targets our tunnel host and range. Nothing is written above
-- this line, so an error there leaves the route whole.
local n = 0
for i = 1, #KEYS do
    n = n + redis.call("DEL", KEYS[i])
end
-- traefik's lists are numbered from 0 without gaps; item 0 is among KEYS. Another writer may
-- have made them longer, so delete on until an index is missing (bounded all the same).
local lists = {
    { ARGV[4] .. "entryPoints/", "" },
    { ARGV[5] .. "loadBalancer/servers/", "/url" },
}
for _, list in ipairs(lists) do
    for i = 1, 63 do
        local gone = redis.call("DEL", list[1] .. i .. list[2])
        if gone == 0 then
            break
        end
        n = n + gone
    end
end
return n

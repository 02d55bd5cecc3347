import sys, subprocess, collections
f, anchor = sys.argv[1], sys.argv[2]
out = subprocess.run(["perf","script","-i",f,"-F","ip,sym"],capture_output=True,text=True).stdout
total=0; under=0; child=collections.Counter()
for block in out.split("\n\n"):
    frames=[l.split(None,1)[1].strip() if len(l.split(None,1))>1 else "?" for l in block.strip().splitlines()]
    if not frames: continue
    total+=1
    # frames[0] is leaf
    if anchor in frames:
        under+=1
        i=frames.index(anchor)
        child[frames[i-1] if i>0 else "(self)"]+=1
print(f"{anchor}: {100*under/total:.1f}% of samples")
for k,v in child.most_common(12): print(f"  {100*v/total:5.1f}%  {k}")

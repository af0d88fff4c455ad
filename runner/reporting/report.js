(function(){
  var viewer=document.getElementById('viewer'),frame=viewer.querySelector('.frame'),
      cap=viewer.querySelector('figcaption');
  function open(num){
    var t=document.getElementById('full-'+num);
    if(!t)return;
    frame.replaceChildren(t.content.cloneNode(true));
    cap.textContent=t.getAttribute('data-caption')||'';
    viewer.hidden=false;viewer.focus();
  }
  function close(){viewer.hidden=true;frame.replaceChildren();}
  document.addEventListener('click',function(e){
    var b=e.target.closest('[data-job]');
    if(b){e.preventDefault();open(b.getAttribute('data-job'));return;}
    if(!viewer.hidden&&viewer.contains(e.target))close();
  });
  document.addEventListener('keydown',function(e){if(e.key==='Escape'&&!viewer.hidden)close();});
  function value(row,i){var c=row.cells[i];var v=c.getAttribute('data-v');return v===null?c.textContent.trim():v;}
  function sortBy(table,th,i){
    var asc=th.getAttribute('aria-sort')!=='ascending',num=th.getAttribute('data-type')==='num';
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(h){h.removeAttribute('aria-sort');});
    th.setAttribute('aria-sort',asc?'ascending':'descending');
    var body=table.tBodies[0],rows=Array.prototype.slice.call(body.rows);
    rows.sort(function(a,b){
      var x=value(a,i),y=value(b,i);
      if(x===''||y==='')return (x==='')-(y==='');
      var d=num?parseFloat(x)-parseFloat(y):x.localeCompare(y,undefined,{numeric:true});
      return asc?d:-d;
    });
    rows.forEach(function(r){body.appendChild(r);});
  }
  document.querySelectorAll('table.sortable').forEach(function(table){
    Array.prototype.forEach.call(table.tHead.rows[0].cells,function(th,i){
      th.tabIndex=0;
      th.addEventListener('click',function(){sortBy(table,th,i);});
      th.addEventListener('keydown',function(e){
        if(e.key==='Enter'||e.key===' '){e.preventDefault();sortBy(table,th,i);}
      });
    });
  });
})();
